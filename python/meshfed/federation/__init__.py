"""Federation: peering between zones, the peering stream, exports and imports."""
