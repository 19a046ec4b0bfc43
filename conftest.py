# lets tests import the top-level modules (nanodeltamem, data.*) from the repo root
