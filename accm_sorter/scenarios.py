"""Seeded ground-truth recordings made with SpikeInterface's generators.

Used by ``accm-sorter demo``, the tests and the benchmarks, so every number we quote can be
re-made from a name and a seed.
"""

from __future__ import annotations

from pathlib import Path

from spikeinterface.core import generate_ground_truth_recording, generate_sorting

PROBE32 = dict(num_columns=2, num_contact_per_column=16, xpitch=20.0, ypitch=20.0,
               contact_shapes="circle", contact_shape_params={"radius": 6})
TETRODE = dict(num_columns=2, num_contact_per_column=2, xpitch=20.0, ypitch=20.0,
               contact_shapes="circle", contact_shape_params={"radius": 6})

SCENARIOS = {
    "tetrode": dict(probe=TETRODE, num_units=10, firing_rates=(2.0, 15.0), noise=5.0,
                    locations=dict(margin_um=10.0, minimum_z=5.0, maximum_z=40.0, minimum_distance=12.0)),
    "probe32": dict(probe=PROBE32, num_units=25, firing_rates=(2.0, 15.0), noise=5.0,
                    locations=dict(margin_um=10.0, minimum_z=5.0, maximum_z=50.0, minimum_distance=20.0)),
    "dense-overlap": dict(probe=PROBE32, num_units=25, firing_rates=(20.0, 30.0), noise=5.0,
                          locations=dict(margin_um=10.0, minimum_z=5.0, maximum_z=40.0, minimum_distance=10.0,
                                         distribution="multimodal", num_modes=1)),
    "low-snr": dict(probe=PROBE32, num_units=25, firing_rates=(2.0, 15.0), noise=15.0,
                    locations=dict(margin_um=10.0, minimum_z=5.0, maximum_z=50.0, minimum_distance=20.0)),
}


def generate_scenario(name: str = "probe32", duration: float = 120.0, seed: int = 2002,
                      num_units: int | None = None, gt_folder: str | Path | None = None):
    """Return (recording, gt_sorting) for a named scenario, 30 kHz, upsample_factor=4.

    With ``gt_folder`` the ground-truth spike trains are saved there and the returned recording
    is lazy *and* serializable (``run_sorter`` needs that); it is sample-identical to the
    in-memory one for the same name, duration and seed.
    """
    if name not in SCENARIOS:
        raise ValueError(f"Unknown scenario '{name}'; choose one of {sorted(SCENARIOS)}.")
    spec = SCENARIOS[name]
    sampling_frequency = 30000.0
    sorting = None
    if gt_folder is not None:
        sorting = generate_sorting(
            num_units=num_units or spec["num_units"], sampling_frequency=sampling_frequency,
            durations=[float(duration)], firing_rates=spec["firing_rates"], refractory_period_ms=4.0, seed=seed,
        )
        sorting = sorting.save(folder=gt_folder, overwrite=True)
    recording, sorting = generate_ground_truth_recording(
        sorting=sorting,
        durations=[float(duration)],
        sampling_frequency=sampling_frequency,
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
    if gt_folder is not None:
        # SpikeInterface 0.105 cannot rebuild an upsampled InjectTemplatesRecording from JSON (its
        # upsample_vector comes back as a list); pickle round-trips it, so steer run_sorter to pickle.
        recording._serializability["json"] = False
    return recording, sorting
