"""edgecells.calibration: host-side data sets, stain targets and calibration sets."""
