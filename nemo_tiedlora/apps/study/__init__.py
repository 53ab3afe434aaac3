"""The study harness: the paper's five task types, their metrics and the results report.

Nothing here imports NeMo or Megatron, and nothing is downloaded:

* :mod:`nemo_tiedlora.apps.study.tasks` reads each public dataset in its own file format from a local folder
  (SQuAD v1.1, DialogSum, HellaSwag, IWSLT 2017 de-en, GSM8K), writes NeMo SFT JSONL splits
  (:func:`~nemo_tiedlora.apps.study.tasks.prepare`) and scores predictions with the task's metric. Each task also
  writes a small generated sample in the dataset's format, for tests and the default demo sweep.
* :mod:`nemo_tiedlora.apps.study.report` turns a sweep's results file into a Table-2-style markdown table and two
  plots (``python -m nemo_tiedlora report results.csv --out DIR``), drawn by :mod:`nemo_tiedlora.apps.study.plots`.
"""
