"""Simulated MRI data whose contrast is governed by its metadata (fastMRI h5 and CMRxRecon .mat files).

Modules: :mod:`tissue` (relaxation values, signal equations), :mod:`acquisition` (protocol/scanner sampling),
:mod:`brain_phantom` (MNI152 anatomy), :mod:`cardiac_phantom` (beating heart), :mod:`kspace` (coils, noise,
oversampling), :mod:`ismrmrd_header`, :mod:`matlab_io`, :mod:`fastmri_writer`, :mod:`cmrx_writer`.
"""
