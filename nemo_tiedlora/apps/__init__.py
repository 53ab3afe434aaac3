"""The applications, on top of everything else: the command line (``python -m nemo_tiedlora``), NeMo-style entry scripts
and their hydra configs (``entry_scripts``), the demo, the study, the benchmarks, and the YAML data (``conf``)."""
