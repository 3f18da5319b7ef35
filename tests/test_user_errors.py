"""Every input a user can get wrong gives a correct result or a one-line error naming the problem and the fix.

The table of issue 13, one section per area; each row is a test. CLI errors are single lines with exit
status 2 (``hf_qad.cli.common.CommandError``).
"""


# ============================================================================ loading, saving and exporting models
# (NVFP4Config options, tied embeddings, packed checkpoints with missing tensors, the advisory hf_qad entry,
#  hf-qad export's output folder, outlier weights)


# ============================================================================ training
# (non-finite gradients, resuming from a packed export, hf-qad train's flags, empty datasets, DDP without
#  gradient checkpointing)


# ============================================================================ command line and data
# (BOS, eval's teacher and tokenizer checks, long paragraphs in text files, CLI argument values)


# ============================================================================ compute dtype on CPUs
# (bf16 only where the CPU computes it natively; hf-qad train without an accelerator)
