"""Prefect task for the records stage (thin: config -> minima.data.records -> artifact dict)."""

from tasks._common import make_task

records_lm_task = make_task("records_lm")
records_chat_task = make_task("records_chat")
records_pref_task = make_task("records_pref")
