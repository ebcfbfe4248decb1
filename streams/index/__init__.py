"""The vector-index domain: configs, records, Head/Tail segments, filters. No I/O here."""
