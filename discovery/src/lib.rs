//! shroud's discovery service (being written).
