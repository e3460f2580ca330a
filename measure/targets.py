"""The targets of the figures bench.py prints: (comparison, value), met or MISSED beside each figure."""

TARGETS = {"evi_overhead": ("<=", 1.15), "fpo_over_sft": ("<=", 1.6), "etinstruct_hours": ("<=", 6.0),
           "learn_s": ("<=", 600.0), "tvg_f1": (">=", 80.0), "dvc_f1": (">=", 60.0), "fpo_gnd_change": (">=", -1.0),
           "tvg_picks": (">=", 85.0), "mfu_batch1": (">=", 0.25), "mfu_chosen": (">=", 0.45),
           "tiny_gpu_over_cpu": (">=", 5.0), "tokens_s_batch1": (">=", 80.0), "tokens_s_batch8": (">=", 500.0),
           "etbench_hours": ("<=", 0.5)}
