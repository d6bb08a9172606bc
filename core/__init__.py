"""The ground floor: values every package may import (errors, options, clock, file writes); it imports
none of the project's packages."""
