"""The LRP-ε defaults, each defined once (one per use).

ε is the stabiliser in the LRP-ε rule's denominator, z + ε·sign(z) (Bach et al. 2015,
"On pixel-wise explanations ...", PLoS ONE; Montavon et al. 2019, "Layer-wise relevance
propagation: an overview"). Two uses need different values:

- ``EPSILON_EXPLAIN`` (1e-6): maps a user looks at (``auditkit explain``, ``explain.attribute``).
  Near LRP-0, so the map stays close to gradient × input and conserves relevance; ε only guards
  against division by an exact zero.
- ``EPSILON_AUDIT`` (0.01): maps that are scored or trained on (the audit's relevance share,
  discovery's clustering, TEA's heat loss; Bassi, Ali, Cavalli, Decherchi 2024, "Training with
  Explanations Alone: A New Paradigm to Prevent Shortcut Learning", arXiv:2407.09788, train on
  LRP-ε maps with a small positive ε). A larger ε
  absorbs weak, noisy contributions, so scores and the training loss do not swing on near-zero
  pre-activations.
"""

EPSILON_EXPLAIN: float = 1e-6
EPSILON_AUDIT: float = 0.01
