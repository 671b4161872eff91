"""edgecells: blood-smear screening on the microscope itself."""

__version__ = "0.1.0"
