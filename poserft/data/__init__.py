"""Data layer: HDF5 split files (``h5io``), torch datasets (``dataset``), real-dataset
converters (``converters``) and the synthetic embedded world (``synthetic``).

Kept import-free on purpose: the Snakefile imports ``poserft.data.config`` at parse time,
which must not pull in h5py or torch.
"""
