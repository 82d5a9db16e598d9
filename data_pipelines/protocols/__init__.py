"""Evaluation protocols of public datasets: the fixed pairs and frames a paper's table is
computed on, shipped as data files in facediff's own format (``*.json`` next to the
reader that loads them), and the steps that turn a dataset download into an exported
evaluation set (``data_pipelines.export``) with its pairs.

* ``ffpp``: FaceForensics++ face swapping (TGDM Tab. 4): ``ffpp_swap.json``.
"""
