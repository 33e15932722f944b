"""Experiment configs: one file per experiment, `get_config()` returning an ml_collections.ConfigDict.

Variants import their base (`from configs import enwik8_small`) and override it.
"""
