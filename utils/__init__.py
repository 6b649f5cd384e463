"""Pure MRI math and plumbing: FFTs, masks, coil maps, SENSE operators, CG, metrics, data, samplers."""
