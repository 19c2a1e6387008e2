"""AIRD repair: the edit (Eq. 4), the α search and budgets, the edited checkpoint, the ``repair`` job."""
