"""Encoder agents' side of lmas: BERT-style encoders and their self-supervised objectives (MLM, NSP)."""
