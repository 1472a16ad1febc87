"""Discovery: find a model's shortcuts when nobody has masks (SpRAy clusters, candidate regions with a
causal test against a control, global probes) and propose masks and a repair. See runner.py."""

from .probes import PROBES, run_probes
from .regions import box_iou
from .runner import (
           NO_SHORTCUT,
           NOT_ALL_TESTED,
           SCHEMA,
           SHORTCUT_FOUND,
           DiscoveryConfig,
           DiscoveryReport,
           discovery_limits,
           proposed_dataset,
           real_masks,
           run_discovery,
)
from .spray import Cluster, eigengap_count, strategy_clusters

__all__ = ["NOT_ALL_TESTED", "NO_SHORTCUT", "PROBES", "SCHEMA", "SHORTCUT_FOUND", "Cluster", "DiscoveryConfig",
           "DiscoveryReport", "box_iou", "discovery_limits", "eigengap_count", "proposed_dataset", "real_masks",
           "run_discovery", "run_probes", "strategy_clusters"]
