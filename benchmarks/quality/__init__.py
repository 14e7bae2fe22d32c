"""Quality of WRAG on the committed domain shards: eval_quality (the run), eval_quality_lib (its
building blocks: per-text NLL, dense deltas, retrieval plans, text sets, ablation trainer) and
eval_quality_report (markdown tables and figure from its JSON)."""
