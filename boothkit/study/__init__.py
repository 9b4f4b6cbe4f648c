"""`boothkit study`: the whole DreamBooth benchmark in one command (issue 15)."""
