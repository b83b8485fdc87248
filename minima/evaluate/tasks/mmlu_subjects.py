"""Subject -> category tables of MMLU, C-Eval and CMMLU, and the Chinese subject names their prompts use.

MMLU: the four categories of hendrycks/test and lm-eval (category score = mean over all questions).
C-Eval: the four categories of the official ``subject_mapping.json`` (category score = mean of subjects).
CMMLU: the five categories of the official ``categories.py``; a subject may count in two of them
(e.g. ``ancient_chinese`` is Social Science and China specific) (category score = mean of subjects).
"""

from __future__ import annotations


def _table(groups: dict[str, str]) -> dict[str, str]:
    return {subject: cat for cat, names in groups.items() for subject in names.split()}


MMLU_CATEGORIES = _table(
    {
        "stem": "abstract_algebra anatomy astronomy college_biology college_chemistry college_computer_science "
        "college_mathematics college_physics computer_security conceptual_physics electrical_engineering "
        "elementary_mathematics high_school_biology high_school_chemistry high_school_computer_science "
        "high_school_mathematics high_school_physics high_school_statistics machine_learning",
        "humanities": "formal_logic high_school_european_history high_school_us_history high_school_world_history "
        "international_law jurisprudence logical_fallacies moral_disputes moral_scenarios philosophy "
        "prehistory professional_law world_religions",
        "social_sciences": "econometrics high_school_geography high_school_government_and_politics "
        "high_school_macroeconomics high_school_microeconomics high_school_psychology human_sexuality "
        "professional_psychology public_relations security_studies sociology us_foreign_policy",
        "other": "business_ethics clinical_knowledge college_medicine global_facts human_aging management marketing "
        "medical_genetics miscellaneous nutrition professional_accounting professional_medicine virology",
    }
)

CEVAL_CATEGORIES = _table(
    {
        "STEM": "computer_network operating_system computer_architecture college_programming college_physics "
        "college_chemistry advanced_mathematics probability_and_statistics discrete_mathematics "
        "electrical_engineer metrology_engineer high_school_mathematics high_school_physics high_school_chemistry "
        "high_school_biology middle_school_mathematics middle_school_biology middle_school_physics "
        "middle_school_chemistry veterinary_medicine",
        "Social Science": "college_economics business_administration marxism mao_zedong_thought education_science "
        "teacher_qualification high_school_politics high_school_geography middle_school_politics "
        "middle_school_geography",
        "Humanities": "modern_chinese_history ideological_and_moral_cultivation logic law "
        "chinese_language_and_literature art_studies professional_tour_guide legal_professional high_school_chinese "
        "high_school_history middle_school_history",
        "Other": "civil_servant sports_science plant_protection basic_medicine clinical_medicine "
        "urban_and_rural_planner accountant fire_engineer environmental_impact_assessment_engineer tax_accountant "
        "physician",
    }
)

CEVAL_ZH = dict(
    zip(
        CEVAL_CATEGORIES,
        [
            "计算机网络",
            "操作系统",
            "计算机组成",
            "大学编程",
            "大学物理",
            "大学化学",
            "高等数学",
            "概率统计",
            "离散数学",
            "注册电气工程师",
            "注册计量师",
            "高中数学",
            "高中物理",
            "高中化学",
            "高中生物",
            "初中数学",
            "初中生物",
            "初中物理",
            "初中化学",
            "兽医学",
            "大学经济学",
            "工商管理",
            "马克思主义基本原理",
            "毛泽东思想和中国特色社会主义理论体系概论",
            "教育学",
            "教师资格",
            "高中政治",
            "高中地理",
            "初中政治",
            "初中地理",
            "近代史纲要",
            "思想道德修养与法律基础",
            "逻辑学",
            "法学",
            "中国语言文学",
            "艺术学",
            "导游资格",
            "法律职业资格",
            "高中语文",
            "高中历史",
            "初中历史",
            "公务员",
            "体育学",
            "植物保护",
            "基础医学",
            "临床医学",
            "注册城乡规划师",
            "注册会计师",
            "注册消防工程师",
            "环境影响评价工程师",
            "税务师",
            "医师资格",
        ],
    )
)

# CMMLU: subject -> (Chinese name, subcategories); categories group the subcategories.
_CMMLU = """
agronomy 农学 other|anatomy 解剖学 biology|ancient_chinese 古汉语 linguistics,china|arts 艺术学 arts
astronomy 天文学 physics|business_ethics 商业伦理 business
chinese_civil_service_exam 中国公务员考试 politics,china|chinese_driving_rule 中国驾驶规则 other,china
chinese_food_culture 中国饮食文化 culture,china|chinese_foreign_policy 中国外交政策 politics,china
chinese_history 中国历史 history,china|chinese_literature 中国文学 literature,china
chinese_teacher_qualification 中国教师资格 education,china|clinical_knowledge 临床知识 other
college_actuarial_science 大学精算学 math|college_education 大学教育学 education
college_engineering_hydrology 大学工程水文学 engineering|college_law 大学法律 law
college_mathematics 大学数学 math|college_medical_statistics 大学医学统计 statistics
college_medicine 大学医学 other|computer_science 计算机科学 cs|computer_security 计算机安全 other
conceptual_physics 概念物理学 physics|construction_project_management 建设工程管理 other,china
economics 经济学 economics|education 教育学 education|electrical_engineering 电气工程 engineering
elementary_chinese 小学语文 linguistics,china|elementary_commonsense 小学常识 other,china
elementary_information_and_technology 小学信息技术 other|elementary_mathematics 初等数学 math
ethnology 民族学 culture,china|food_science 食品科学 other|genetics 遗传学 biology
global_facts 全球事实 global|high_school_biology 高中生物 biology|high_school_chemistry 高中化学 chemistry
high_school_geography 高中地理 geography|high_school_mathematics 高中数学 math
high_school_physics 高中物理学 physics|high_school_politics 高中政治 politics,china
human_sexuality 人类性行为 other|international_law 国际法学 law|journalism 新闻学 sociology
jurisprudence 法理学 law|legal_and_moral_basis 法律与道德基础 other|logical 逻辑学 philosophy
machine_learning 机器学习 cs|management 管理学 business|marketing 市场营销 business
marxist_theory 马克思主义理论 philosophy|modern_chinese 现代汉语 linguistics,china|nutrition 营养学 other
philosophy 哲学 philosophy|professional_accounting 专业会计 business|professional_law 专业法学 law
professional_medicine 专业医学 other|professional_psychology 专业心理学 psychology
public_relations 公共关系 politics|security_study 安全研究 politics|sociology 社会学 culture
sports_science 体育学 other|traditional_chinese_medicine 中医中药 other,china|virology 病毒学 biology
world_history 世界历史 history|world_religions 世界宗教 global
"""
_CMMLU_GROUPS = {
    "STEM": {"physics", "chemistry", "biology", "cs", "math", "engineering", "statistics"},
    "Humanities": {"history", "philosophy", "law", "arts", "literature", "global"},
    "Social Science": {
        "linguistics",
        "business",
        "politics",
        "culture",
        "economics",
        "geography",
        "psychology",
        "education",
        "sociology",
    },
    "Other": {"other"},
    "China specific": {"china"},
}
CMMLU_ZH: dict[str, str] = {}
CMMLU_CATEGORIES: dict[str, list[str]] = {}
for _entry in _CMMLU.replace("\n", "|").split("|"):
    if _entry.strip():
        _name, _zh, _subs = _entry.split()
        CMMLU_ZH[_name] = _zh
        CMMLU_CATEGORIES[_name] = [c for c, subs in _CMMLU_GROUPS.items() if subs & set(_subs.split(","))]
