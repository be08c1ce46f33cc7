"""The whole-volume CT application built on the library: datasets on disk (`data`), the
training loop and its helpers (`train`, `augment`, `preprocess`, `distributed`, `train_log`,
`run_checkpoint`, `model_config`, `precision`, `phantom_cache`), inference (`predict`),
scoring (`evaluate`, `metrics`), memory planning (`planner`) and the command line (`cli`,
`python -m effseg`). It imports the library and the integrations; nothing imports it but the
command line and the tests.
"""
