"""Seeded ground-truth recordings made with SpikeInterface's generators.

Used by ``accm-sorter demo``, the tests and the benchmarks, so every number we quote can be
re-made from a name and a seed.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import spikeinterface.preprocessing as spre
from spikeinterface.core import generate_ground_truth_recording, load

UV_PER_BIT = 0.25

PROBE32 = dict(num_columns=2, num_contact_per_column=16, xpitch=20.0, ypitch=20.0,
               contact_shapes="circle", contact_shape_params={"radius": 6})
TETRODE = dict(num_columns=2, num_contact_per_column=2, xpitch=20.0, ypitch=20.0,
               contact_shapes="circle", contact_shape_params={"radius": 6})

SMALL8 = dict(num_columns=2, num_contact_per_column=4, xpitch=20.0, ypitch=20.0,
              contact_shapes="circle", contact_shape_params={"radius": 6})

SCENARIOS = {
    "small8": dict(probe=SMALL8, num_units=8, firing_rates=(5.0, 15.0), noise=5.0,
                   locations=dict(margin_um=10.0, minimum_z=5.0, maximum_z=40.0, minimum_distance=15.0)),
    "tetrode": dict(probe=TETRODE, num_units=10, firing_rates=(2.0, 15.0), noise=5.0,
                    locations=dict(margin_um=10.0, minimum_z=5.0, maximum_z=40.0, minimum_distance=12.0)),
    "probe32": dict(probe=PROBE32, num_units=25, firing_rates=(2.0, 15.0), noise=5.0,
                    locations=dict(margin_um=10.0, minimum_z=5.0, maximum_z=50.0, minimum_distance=20.0)),
    "dense-overlap": dict(probe=PROBE32, num_units=25, firing_rates=(20.0, 30.0), noise=5.0,
                          locations=dict(margin_um=10.0, minimum_z=5.0, maximum_z=40.0, minimum_distance=10.0,
                                         distribution="multimodal", num_modes=1)),
    "low-snr": dict(probe=PROBE32, num_units=25, firing_rates=(2.0, 15.0), noise=15.0,
                    locations=dict(margin_um=10.0, minimum_z=5.0, maximum_z=50.0, minimum_distance=20.0)),
    # rigid zigzag +-20 um with a 60 s period from t = 15 s, spatially correlated noise 6-8 uV
    "drift": dict(probe=PROBE32, num_units=25, firing_rates=(2.0, 15.0), drifting=True,
                  locations=dict(margin_um=10.0, minimum_z=5.0, maximum_z=50.0, minimum_distance=20.0)),
}


def generate_scenario(name: str = "probe32", duration: float = 120.0, seed: int = 2002,
                      num_units: int | None = None, folder: str | Path | None = None):
    """Return (recording, gt_sorting) for a named scenario, 30 kHz, upsample_factor=4.

    Without ``folder`` both are lazy, in memory. With ``folder`` they are written there once
    (int16 binary recording at 0.25 uV per bit, plus the ground-truth sorting) and loaded from
    there on later calls, so every sorter reads byte-identical data and the recording can be
    sent to worker processes.
    """
    if name not in SCENARIOS:
        raise ValueError(f"Unknown scenario '{name}'; choose one of {sorted(SCENARIOS)}.")
    spec = dict(name=name, duration=float(duration), seed=int(seed), num_units=num_units)
    if folder is not None:
        folder = Path(folder)
        spec_file = folder / "scenario.json"
        if spec_file.exists() and json.loads(spec_file.read_text()) == spec:
            return load(folder / "recording"), load(folder / "gt_sorting")
    recording, sorting = _generate(name, float(duration), int(seed), num_units)
    if folder is None:
        return recording, sorting
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    as_int16 = spre.scale(recording, gain=1.0 / UV_PER_BIT, dtype="int16")
    as_int16.set_channel_gains(UV_PER_BIT)
    as_int16.set_channel_offsets(0.0)
    with warnings.catch_warnings():
        # generated extractors have no provenance to save; SpikeInterface says so on every save
        warnings.filterwarnings("ignore", message="The extractor is not serializable")
        saved = as_int16.save(folder=folder / "recording", format="binary", n_jobs=1, chunk_duration="1s",
                              progress_bar=False)
        gt = sorting.save(folder=folder / "gt_sorting")
    (folder / "scenario.json").write_text(json.dumps(spec))
    return saved, gt


def _generate(name, duration, seed, num_units):
    spec = SCENARIOS[name]
    if spec.get("drifting"):
        return _generate_drifting(spec, duration, seed, num_units)
    recording, sorting = generate_ground_truth_recording(
        durations=[duration],
        sampling_frequency=30000.0,
        num_channels=spec["probe"]["num_columns"] * spec["probe"]["num_contact_per_column"],
        num_units=num_units or spec["num_units"],
        generate_probe_kwargs=spec["probe"],
        generate_sorting_kwargs=dict(firing_rates=spec["firing_rates"], refractory_period_ms=4.0),
        noise_kwargs=dict(noise_levels=spec["noise"], strategy="on_the_fly"),
        generate_unit_locations_kwargs=spec["locations"],
        upsample_factor=4,
        seed=seed,
    )
    recording.annotate(is_filtered=False)
    return recording, sorting


def _generate_drifting(spec, duration, seed, num_units):
    from probeinterface import generate_multi_columns_probe
    from spikeinterface.generation import generate_drifting_recording

    probe = generate_multi_columns_probe(**spec["probe"])
    probe.set_device_channel_indices(list(range(probe.get_contact_count())))
    _, recording, sorting, extra = generate_drifting_recording(
        num_units=num_units or spec["num_units"],
        duration=duration,
        sampling_frequency=30000.0,
        probe=probe,
        generate_unit_locations_kwargs=dict(spec["locations"], max_iteration=100, distance_strict=False),
        generate_displacement_vector_kwargs=dict(
            displacement_sampling_frequency=5.0, drift_start_um=[0, 20], drift_stop_um=[0, -20], drift_step_um=1,
            motion_list=[dict(drift_mode="zigzag", non_rigid_gradient=None, t_start_drift=min(15.0, duration / 4),
                              t_end_drift=None, period_s=60.0)],
        ),
        generate_sorting_kwargs=dict(firing_rates=spec["firing_rates"], refractory_period_ms=4.0),
        generate_noise_kwargs=dict(noise_levels=(6.0, 8.0), spatial_decay=25.0),
        extra_outputs=True,
        seed=seed,
    )
    sorting.set_property("gt_unit_locations", np.asarray(extra["unit_locations"]))
    recording.annotate(is_filtered=False)
    return recording, sorting
