"""One module per pipeline stage: resolve the config, build the components, run, publish the artifact.

Each stage's ``run(cfg, force=False) -> Artifact`` is listed in minima.core.registry.STAGE_RUNNERS.
May import every minima package except the CLI; nothing in minima imports a stage.
"""
