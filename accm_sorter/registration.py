"""Adds "accm" to SpikeInterface's sorter registry, in place.

``spikeinterface.sorters.runsorter`` imported ``sorter_dict`` by name, so the registry objects must
be mutated, never replaced.
"""

from __future__ import annotations


def register() -> None:
    from spikeinterface.sorters import sorterlist

    from .sorter import ACCMSorter

    sorterlist.sorter_full_list[:] = [
        s for s in sorterlist.sorter_full_list if getattr(s, "sorter_name", None) != ACCMSorter.sorter_name
    ]
    sorterlist.sorter_full_list.append(ACCMSorter)
    sorterlist.sorter_dict[ACCMSorter.sorter_name] = ACCMSorter
