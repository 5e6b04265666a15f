//! keras-ee native core (placeholder, filled by the calibrator work).
