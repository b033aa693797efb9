from .image import *
from .io import *
from .annotations import *
from .transforms import *
