"""Model shapes the parity tests share: GQA ratios 1, 2 and 4; tied and untied; head dim 48 != dim / heads."""

PARITY_SHAPES = {
    "mha-tied": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=4, ffn_dim=160, tie_embeddings=True),
    "gqa2-untied-hd48": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, head_dim=48,
                             tie_embeddings=False),
    "gqa4-tied": dict(dim=64, n_layers=3, n_heads=8, n_kv_heads=2, ffn_dim=192, tie_embeddings=True),
}
