"""The steps methods are made of: `base` (the Stage contract), `training`, `teachers`, `subruns`."""
