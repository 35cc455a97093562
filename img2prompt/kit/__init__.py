"""The Kaggle kit's package (`img2prompt kaggle-kit`: one folder to upload as a Kaggle dataset, from which an
offline notebook submits), one module per part of the kit.

The modules, one job each: build (KitOptions, build_kit: checks the options, then assembles the kit), wheels
(img2prompt's wheel and the dependency closure a Kaggle image lacks), clip (the CLIP folders in open_clip's
local-dir layout), files (the index copy, kit.json, README), folder (which --out may be replaced, the swap,
what killed runs left) and template (the notebook's and submit.py's code).
"""
