"""The one helper that writes a small simtorch store for a test (also the ``write_store`` fixture)."""

from __future__ import annotations


def write_store(path, name, layers, inputs=None, *, chunk=7, fingerprint="sha256:test", complete=True):
    """A simtorch store written directly with ``ZarrStore`` (as extract does), then reopened read-only.

    ``layers`` maps layer names to arrays of shape (n_samples, ...), stored in their own dtype; ``inputs``
    (optional) become the store's confounder array. Incomplete stores record one chunk as done.
    """
    from extract.store import INPUTS_ARRAY, LAYERS_GROUP, StoreInfo, ZarrStore

    store = ZarrStore(path, read_only=False, create=True)
    n = len(next(iter(layers.values())))
    for layer, array in layers.items():
        store.create_array(f"{LAYERS_GROUP}/{layer}", array.shape, str(array.dtype), chunk)
        store.write(f"{LAYERS_GROUP}/{layer}", 0, array)
    if inputs is not None:
        store.create_array(INPUTS_ARRAY, inputs.shape, str(inputs.dtype), chunk)
        store.write(INPUTS_ARRAY, 0, inputs)
    store.write_info(StoreInfo(
        model_name=name, layers=list(layers), n_samples=n, chunk_samples=chunk,
        dtype=str(next(iter(layers.values())).dtype), samples_done=n if complete else chunk,
        fingerprint=fingerprint, complete=complete, inputs_stored=inputs is not None,
        input_shape=list(inputs.shape[1:]) if inputs is not None else [],
    ))
    return ZarrStore(path)

