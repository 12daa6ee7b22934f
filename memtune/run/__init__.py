"""Running a plan: the Trainer run (`runner`), the OOM guard, the accelerate launch configs (`launch`)
and the training data (`data`).
"""
