"""accm-sorter: the ACCM contrastive spike sorter as a SpikeInterface plugin.

``import accm_sorter`` registers the sorter "accm" with ``spikeinterface.sorters``.
"""

__version__ = "0.1.0"

from .registration import register  # noqa: E402

register()

from .sorter import ACCMSorter  # noqa: E402

__all__ = ["ACCMSorter", "register", "__version__"]
