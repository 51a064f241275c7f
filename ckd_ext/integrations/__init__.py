"""ckd_ext inside the training code people already run. Each module imports its framework when it is imported (never
from ``import ckd_ext``), so none of the frameworks is a dependency of ckd_ext:

    ckd_ext.integrations.transformers   DistillationTrainer and CausalLMDistillationLoss: a causal LM distilled
                                        through the fused-linear losses under Hugging Face's Trainer (or TRL)
    ckd_ext.integrations.torchdistill   the losses in torchdistill's loss registry, for its YAML configs
    ckd_ext.integrations.mdistiller     Distiller classes (CKD, BicKD, KD) for mdistiller's training code (no import)
    ckd_ext.integrations.lightning      DistillationModule: a LightningModule, global negatives under DDP

Runnable examples of each: examples/.
"""
