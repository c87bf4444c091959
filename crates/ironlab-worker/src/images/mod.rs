//! Images: OCI registry pulls and layout imports into ext4 drive files.
