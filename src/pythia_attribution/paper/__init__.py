"""The manuscript's build: figures, tables and variables from the Arrow tables, and a preview.

Reads Arrow tables only (pyarrow, polars, plotnine); never imports torch or bergson.
"""
