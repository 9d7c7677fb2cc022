"""Paper A's Res-Dom scenario: a frozen ResNet with routed conv adapters on its 8 residual blocks, one expert per
domain, trained with the stock `transformers.Trainer` (see recipes/res_dom.py)."""
