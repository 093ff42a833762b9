"""The zoo: a catalogue of broken and healthy trainings, and how well the monitor names them
(``make zoo``, ``python -m gradwatch.zoo``)."""
