"""The corpus stage: micro-Pile from pinned registry artifacts plus synthetic ground truth."""
