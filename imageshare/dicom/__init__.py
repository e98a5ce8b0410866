"""DICOM network adapters: the DIMSE listener (SCP, :mod:`.scp`) and the two site clients
behind :class:`imageshare.exchange.sites.SiteClient`: DIMSE (:mod:`.scu`) and DICOMweb
(:mod:`.dicomweb_site`)."""
