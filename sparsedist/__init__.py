"""sparsedist: 2:4 semi-structured sparse training of LLMs at cluster scale."""
