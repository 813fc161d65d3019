"""Distillation methods and the teacher they distil: Barlow Twins, KRR-ST (and
FRePo), KIP, parameter matching (IADD / MTT)."""
