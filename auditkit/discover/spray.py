"""Strategy clusters: spectral relevance analysis (SpRAy; Lapuschkin et al. 2019, "Unmasking Clever
Hans predictors and assessing what machines really learn", Nat. Commun. 10:1096, §Methods "Spectral
relevance analysis").

Per class, each image's LRP-ε relevance map for its label is reduced to a small relevance
distribution (positive part, area-averaged to ``grid`` x ``grid`` cells, normalised to sum 1), a
k-nearest-neighbour affinity graph is built over those vectors, and the eigengap of the graph's
normalised Laplacian picks the number of clusters (SpRAy's "eigengap heuristic"); scikit-learn's
spectral clustering then assigns the images. A class the model solves in one way stays one cluster;
a class it solves in several (the digit, or a corner tag in one of four places) splits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class Cluster:
    """One strategy: ``members`` index the analysed images (all of class ``label``)."""

    label: int
    number: int  # within its class
    members: np.ndarray  # (n,) int, positions in the analysed pool
    eigengap: float  # the gap that chose the class's cluster count (0 for a single image)


def relevance_distribution(maps: torch.Tensor) -> torch.Tensor:
    """(N, H, W) signed relevance -> (N, H, W) positive relevance summing to 1 per map (uniform when a
    map has no positive relevance, so such images neither vanish nor dominate)."""
    positive = maps.clamp(min=0).double()
    total = positive.sum(dim=(1, 2), keepdim=True)
    uniform = torch.full_like(positive, 1.0 / (maps.shape[1] * maps.shape[2]))
    return torch.where(total > 0, positive / total.clamp(min=1e-300), uniform)


def spray_features(distributions: torch.Tensor, grid: int = 8) -> np.ndarray:
    """(N, H, W) relevance distributions -> (N, grid*grid) float64 (area-averaged cells, L2-normalised:
    the affinity compares where relevance lies, not how much there is)."""
    cells = F.adaptive_avg_pool2d(distributions[:, None].double(), (min(grid, distributions.shape[1]),
                                                                     min(grid, distributions.shape[2])))
    features = cells.flatten(1).numpy()
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return features / np.maximum(norms, 1e-300)


def affinity(features: np.ndarray, neighbours: int) -> np.ndarray:
    """Symmetric 0/1 k-nearest-neighbour affinity (SpRAy's graph), (n, n) float64."""
    from sklearn.neighbors import kneighbors_graph

    k = max(1, min(neighbours, len(features) - 1))
    graph = kneighbors_graph(features, k, mode="connectivity", include_self=False).toarray()
    return np.maximum(graph, graph.T)


def eigengap_count(weights: np.ndarray, max_clusters: int) -> tuple[int, float]:
    """Number of clusters from the largest gap among the smallest eigenvalues of the normalised
    Laplacian L = I - D^-1/2 W D^-1/2 (von Luxburg 2007, §8.3); returns (k, that gap)."""
    degree = weights.sum(1)
    scale = 1.0 / np.sqrt(np.maximum(degree, 1e-12))
    laplacian = np.eye(len(weights)) - scale[:, None] * weights * scale[None, :]
    values = np.sort(np.linalg.eigvalsh(laplacian))[: max_clusters + 1]
    if len(values) < 2:
        return 1, 0.0
    gaps = np.diff(values)
    k = int(np.argmax(gaps)) + 1
    return k, float(gaps[k - 1])


def cluster_class(features: np.ndarray, *, max_clusters: int, neighbours: int, seed: int) -> tuple[np.ndarray, float]:
    """Cluster numbers (n,) for one class's features, and the eigengap that chose their count."""
    n = len(features)
    if n < 3:
        return np.zeros(n, int), 0.0
    weights = affinity(features, neighbours)
    k, gap = eigengap_count(weights, min(max_clusters, n - 1))
    if k == 1:
        return np.zeros(n, int), gap
    from sklearn.cluster import SpectralClustering

    # An affinity with isolated points makes the spectral embedding warn; a tiny floor links them.
    clustering = SpectralClustering(n_clusters=k, affinity="precomputed", random_state=seed, assign_labels="cluster_qr")
    return clustering.fit_predict(weights + 1e-6).astype(int), gap


def strategy_clusters(distributions: torch.Tensor, labels: np.ndarray, *, grid: int = 8, max_clusters: int = 8,
                      neighbours: int | None = None, seed: int = 0) -> list[Cluster]:
    """SpRAy over every class present in ``labels`` (N,): the clusters, class by class.
    ``neighbours``: the k of the kNN graph (default: round(sqrt(n)) clamped to [5, 20], n the class size)."""
    features = spray_features(distributions, grid)
    clusters = []
    for label in np.unique(labels):
        positions = np.flatnonzero(labels == label)
        k = neighbours or int(np.clip(round(np.sqrt(len(positions))), 5, 20))
        assignment, gap = cluster_class(features[positions], max_clusters=max_clusters, neighbours=k, seed=seed)
        for number in np.unique(assignment):
            clusters.append(Cluster(int(label), int(number), positions[assignment == number], gap))
    return clusters
