"""The kernel benchmark that ``prophet bench`` runs (``moe``) and the plumbing shared with the
repository's ``bench/`` scripts (``common``: result rows with provenance, roofline measurements,
MoE inputs)."""
