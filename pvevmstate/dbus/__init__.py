"""The helper on D-Bus: interface declarations (:mod:`.api`, no logic) and the
exported object with the one boundary where errors meet the bus (:mod:`.service`)."""
