"""Dataset layouts as a registry: one small file per layout declares everything the rest of soups
asks of one, so that no other module branches on a layout's name.

A layout reads a folder into parts (`pool`, and `val` / `test` where the data fixes them) of
`soups.samples.Samples`; `data.make_splits` cuts the rest as a pure function of the data and `split_seed`,
never splitting a group. Adding one: a file here that calls `register(Layout(...))`, its import
below, and a test (tests/test_layouts.py runs every registered layout through the same contract).
`files.py` holds what the layouts that read image files share.
"""

# Each layout registers itself on import, in this order: the order --help lists them.
from soups.layouts import csv_list, fashion_mnist, files, imagefolder, mask  # noqa: F401
from soups.layouts.registry import (  # noqa: F401  (the package's face)
    LAYOUTS,
    Attributes,
    Layout,
    every_image,
    get,
    inference_inputs,
    option_names,
    read_layout,
    register,
)
