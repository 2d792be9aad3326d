"""``blockpilot bench``: block-step forwards against the memory roofline, AR decode against ``transformers``, and
plans per decoder, measured in one run on one machine (:mod:`blockpilot.bench.run`). Importing this package
loads nothing heavy."""
