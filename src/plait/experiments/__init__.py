"""The papers' experiments behind ``plait experiment``: E1 gradient bias, E2 batch sweep, E3
information gap, E4 regularisers, E5 fusion, the gamma loss's ablation and the small-batch job."""
