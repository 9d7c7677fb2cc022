"""PEFT integration: the routed adapter tuner and the routed FFN tuner, and the model hooks they share."""
