"""Market-data vendors behind one interface (see :mod:`resources.vendors.base`)."""
