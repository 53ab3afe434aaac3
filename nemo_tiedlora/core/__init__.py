"""The core (pure torch; no NeMo, megatron-core or Lightning import): the configuration and presets, the update (its
reference formula and the hand-written autograd functions), the factor modules, closed-form parameter counts, the
model shape an adapter is built for, the anomaly checks, errors and the atomic file writer."""
